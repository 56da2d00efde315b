"""One module per ``fdc-mol`` sub-command.

Each module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Heavy
imports (torch models, RDKit, xTB) happen inside ``run`` so that ``fdc-mol --help`` stays fast.
"""

COMMANDS: dict[str, str] = {
    "data": "fdc_mol.commands.data",
    "pretrain": "fdc_mol.commands.pretrain",
    "sample": "fdc_mol.commands.sample",
    "evaluate": "fdc_mol.commands.evaluate",
    "finetune": "fdc_mol.commands.finetune",
    "compare": "fdc_mol.commands.compare",
    "demo": "fdc_mol.commands.demo",
    "model-card": "fdc_mol.commands.model_card",
    "toy": "fdc_mol.commands.toy",
}
