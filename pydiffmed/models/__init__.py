"""Denoiser networks built on pydiffmed ops."""
from .attention_block import SpatialAttentionBlock
from .autoencoder import AutoencoderKL
from .checkpoint import CheckpointError, convert_monai_state_dict, load_state_dict_file
from .controlnet import ControlledUNet, ControlNet3D
from .unet import UNet3D

__all__ = ["AutoencoderKL", "CheckpointError", "ControlNet3D", "ControlledUNet", "SpatialAttentionBlock", "UNet3D",
           "convert_monai_state_dict", "load_state_dict_file"]
