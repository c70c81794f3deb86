"""Published checkpoints of other projects, turned into ordinary affectray checkpoints.

    affectray import-checkpoint enet_b0_8_best_afew.pt ckpt/hsemotion-b0 --format hsemotion

Other projects publish whole pickled models (``torch.save(model, path)``), which
``torch.load`` can only open by importing and running whatever the file names.
:mod:`affectray.importers.pickles` reads such files without running them: tensors
are rebuilt, every other object becomes an inert placeholder, and a pickle that
asks to call anything else is refused. Each format's importer
(:mod:`affectray.importers.hsemotion`) rebuilds the model with one of the
platform's own families, loads the weights strictly (every tensor placed, none
left over) and writes a self-describing checkpoint (``affectray.checkpoints``);
:mod:`affectray.importers.job` is the ``import-checkpoint`` verb.
"""
