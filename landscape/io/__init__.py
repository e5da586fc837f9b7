"""What comes in and what is written: checkpoints (:mod:`.checkpoint`, HuggingFace folders :mod:`.hf`), the
``module:callable`` specs (:mod:`.specs`), evaluation data in memory or streamed from disk (:mod:`.data`,
:mod:`.stream`), the HDF5 run file (:mod:`.runfile`) and importers of other tools' files (:mod:`.importers`).
Imports only :mod:`landscape.errors` and :mod:`landscape.runtime`."""
