"""The bundled `demo` model: a small UNet3D trained on pydiffmed.data's head phantoms (see `train`)."""
