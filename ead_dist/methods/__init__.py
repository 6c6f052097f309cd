"""Ways to make a synthetic set beside EAD, chosen by ``distill.method``.

- ``ead``: the coordinator (``ead_dist/coordinator.py``); never reads D.
- ``random`` (``random_real.py``): the run's initial real images with hard labels.
- ``herding`` (``herding.py``): per class, the real images whose running mean embedding
  approaches the class mean in expert 0's final features; reads D once, to embed it.
- ``dm`` (``dm.py``): distribution matching in fresh random networks; reads D every iteration,
  unless ``distill.dm_real: realgrad`` has the realgrad pass compute its real side.
- ``dc`` (``dc.py``): gradient matching with DSA in networks trained on S between matchings;
  reads D every iteration.

Every method ends as a ``SyntheticSet`` that ``synthetic.safetensors`` stores; ``image_sgd.py``
holds what DM and DC share. The stage that runs them is ``ead_dist/stages/baselines.py``.
"""

METHODS = ("ead", "random", "herding", "dm", "dc")
# Whether the method draws real data inside its optimisation loop (its cost then depends on D).
READS_REAL_DATA_IN_LOOP = {"ead": False, "random": False, "herding": False, "dm": True,
                           "dc": True}
