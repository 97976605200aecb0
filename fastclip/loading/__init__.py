"""Getting weights into a model: ``fastclip.load`` / ``create_model`` (factory), checkpoint readers that run no
code (checkpoints), explicit key maps per layout (keymaps), the Hugging Face hub and pretrained tags (hub)."""
