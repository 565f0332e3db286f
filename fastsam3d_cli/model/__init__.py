"""The model core every subcommand uses: SAM-Med3D (teacher), FastSAM3D and FastSAM3D-tiny (students)."""
from fastsam3d_cli.model.attention import BACKENDS, EXACT_BACKENDS
from fastsam3d_cli.model.config import PRESET_NAMES, PRESETS, EncoderConfig, ModelConfig, get_config
from fastsam3d_cli.model.sam3d import Sam3D, build_model

__all__ = ["BACKENDS", "EXACT_BACKENDS", "PRESETS", "PRESET_NAMES", "EncoderConfig", "ModelConfig", "Sam3D",
           "build_model", "get_config"]
