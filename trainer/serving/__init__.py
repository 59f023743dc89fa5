"""Serving a trained model in one plain process: the self-contained model directory (model_dir.py), the user
tower in ONNX (onnx_export.py), the item embeddings in FAISS (index.py) and the held-out metrics recomputed
from the directory (heldout.py). Loading a model directory needs torch, pyarrow and numpy only."""
