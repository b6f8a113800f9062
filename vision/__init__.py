"""Vision stage: image decoding and validation, Pan & Scan tiling, SigLIP encoder and projector."""
