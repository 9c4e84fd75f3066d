"""lrformer: placeholder, being written (registers no variant yet)."""
