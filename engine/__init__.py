"""The training and evaluation engine shared by ``main.py`` and ``light_main.py``.

One module per concern: ``config`` (command line, YAML, recipes), ``data``,
``distributed``, ``train`` (the loop), ``evaluate``, ``checkpoint`` (atomic
save, exact resume, loading any checkpoint format), ``weights_file``
(safetensors: weights with metadata, no pickle), ``reporting`` (console,
tqdm, TensorBoard, CSV), ``errors`` (one clear line for bad input).
"""
