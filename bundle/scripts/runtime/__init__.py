"""The runtime of the brainsynth bundle: the modules its configs import (networks, losses, trainer, data,
inference, evaluation, checkpoints). The users' command-line tools (phantom, prepare_datalist, brainsynth,
monailabel_bundles) live one folder up, in ``scripts/``, the maintainers' (benchmark, reproduce, figures, tables) in
the repository's ``tools/``; neither is part of an exported bundle."""
