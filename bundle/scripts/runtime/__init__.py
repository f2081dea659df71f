"""The runtime of the brainsynth bundle: the modules its configs import (networks, losses, trainer, data,
inference, evaluation, checkpoints). The command-line tools (phantom, prepare_datalist, benchmark, reproduce,
figures, tables, monailabel_bundles) live one folder up, in ``scripts/``, and are not part of an exported bundle."""
