"""ADE20K semantic segmentation experiments (UPerNet and Semantic FPN on CrossFormer)."""
