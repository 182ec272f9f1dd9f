"""The training and evaluation engine shared by ``main.py`` and ``light_main.py``.

One module per concern: ``runner`` (the run, top to bottom), ``config``
(command line, YAML, recipes, the frozen resolved config), ``data`` (a package:
folders, decoding, transforms, sampler, batches, loader), ``distributed``,
``loop`` (what training and validation passes share), ``train`` (one epoch),
``evaluate``, ``state`` (what a run's checkpoint holds, resuming it, saving it),
``checkpoint`` (reading any checkpoint format, atomic writes), ``weights_file``
(safetensors: weights with metadata, no pickle), ``transfer``
(``--init-from``), ``schedule``, ``reporting`` (console, tqdm, TensorBoard,
CSV), ``preemption`` (signals), ``collector``, ``complexity`` (parameters and
FLOPs) and ``errors`` (one clear line for bad input).
"""
