"""Training the projection from image features into the LM's input space (caption data, caption loss, the loop)."""
