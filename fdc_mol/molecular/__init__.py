"""FDC on molecules: the FlowMol adapter, the conformer-descriptor KDE novelty term, the adjoint-matching
LightningModule, the common-random-numbers evaluation and the finetune job that assembles them.

The algorithm itself (objective, adjoint matching, outer loop) is :mod:`fdc_mol.fdc`, used unchanged.
"""
