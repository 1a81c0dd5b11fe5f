"""The toy world, the embedded default that runs CoDe end to end on a CPU in minutes: the procedurally drawn
images and captions (``world``, configured by ``configs/toy_world.yaml``), a word-level CLIP tokenizer
(``word_tokenizer``), pretraining of the small CLIP (``clip_pretraining``), the whole pipeline of world, CLIP,
CoDe training and evaluation (``end_to_end``, behind ``code-seg toy-world``) and diagnostics of the highlighting
masks (``diagnostics``). It builds on every layer below it (root, predict, evaluation, training).
"""
