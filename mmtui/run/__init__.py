"""One attribute run: find and decode images, caption and attribute them, write the results to the store."""
