"""Datasets in their published layouts, the missing-modality protocol, and the shapes world.

Modules (import them directly; this package imports nothing heavy):
``images`` (decoding, bad-image policy, the model's preprocessing spec, ``targetpad``),
``prepared`` (the memory-mapped uint8 image cache), ``base`` (shared dataset classes),
``cirr``, ``coco``, ``food101``, ``mmimdb``, ``hateful_memes``, ``registry``
(``get_classification_dataset``), ``arrow`` (arrow files of earlier missing-modality work),
``missing`` (the protocol), ``shapes`` + ``shapes_scene`` (the generated world).
"""
