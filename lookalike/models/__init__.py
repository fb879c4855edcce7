"""The embedders: the backbone registry, TensorFlow/Keras and ONNX Runtime, embedder specs and builds, dynamic
batching, fine-tuning (``lookalike train``) and self-supervised training (``lookalike train-ssl``). Built on
:mod:`lookalike.data` (one lazy exception: self-supervised training reads a collection's images through
:class:`lookalike.core.gallery.Gallery`)."""
