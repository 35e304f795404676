"""The command line: :mod:`.entry` (the ``hsm``, ``ceremony`` and ``kms`` entry points),
:mod:`.main` (the ``hsm`` command) and :mod:`.options` (the options that name a module, a token
and its PINs, shared by the three commands)."""
