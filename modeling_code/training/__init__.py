"""Training CoDe on image-caption data: the YAML training config (``config``), the streamed, resumable data sources
(``data_sources``), AdamW with warmup and cosine decay (``optimization``) and the Accelerate training loop
(``trainer``). It builds on the root, ``predict`` and ``evaluation`` layers (periodic evaluation keeps the best
model) and knows nothing of publishing: ``training/train.py`` at the repository top level is its command line.
"""
