"""Published checkpoints of other projects, turned into ordinary affectray checkpoints.

    affectray import-checkpoint enet_b0_8_best_afew.pt ckpt/hsemotion-b0 --format hsemotion
    affectray import-checkpoint raf-db-model_best.pth ckpt/poster-v2-rafdb --format poster-v2
    affectray import-checkpoint dfew-fold1.pth ckpt/mae-dfer-dfew1 --format mae-dfer

Other projects publish whole pickled models (``torch.save(model, path)``), which
``torch.load`` can only open by importing and running whatever the file names.
:mod:`affectray.importers.pickles` reads such files without running them: tensors
are rebuilt, every other object becomes an inert placeholder, and a pickle that
asks to call anything else is refused. Each format's importer
(:mod:`~affectray.importers.hsemotion`, :mod:`~affectray.importers.poster_v2`,
:mod:`~affectray.importers.mae_dfer`) rebuilds the model with one of the
platform's own families, loads the weights strictly (every tensor placed, none
left over) and writes a self-describing checkpoint (``affectray.checkpoints``);
:mod:`affectray.importers.job` is the ``import-checkpoint`` verb.
"""
