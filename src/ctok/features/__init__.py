"""Hand-computed image features used as training targets."""
from ctok.features.hog import hog_cells, hog_feature_dim, hog_patch_targets

__all__ = ["hog_cells", "hog_feature_dim", "hog_patch_targets"]
