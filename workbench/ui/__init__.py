"""User interfaces over the core: the Gradio app (`gradio_app`) and notebook widgets (`widgets`)."""
