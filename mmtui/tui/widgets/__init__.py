"""The browser's widgets: pictures (half blocks or real pixels), the layers bar chart, the neuron table."""
