"""Prediction on top of the model: ``CoDeSegmenter`` (``segmenter``) loads a saved model and its processor and turns
images and class names into label maps, score maps and overlays; ``loading`` checks a model source and a device
and names what is wrong before loading; ``visualization`` draws those overlays and legends. It builds only on the root modules (the model, its processors and ``inference``) and is what every
higher layer (evaluation, training, the toy world, the applications) segments with.
"""
