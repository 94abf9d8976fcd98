"""Models: blocks (flat buffers), Hugging Face families as skeleton + blocks, the block-streaming forward,
trainable targets (LoRA, prefix), export and transfer.
"""
