"""The inputs: image files read and squared, datasets and folders as items with lasting ids and splits, files decoded
ahead of the embedder, a folder's catalogue planned against what is stored, sidecar metadata, the filter language.
Imports nothing of the layers above (one lazy exception: :mod:`lookalike.data.datasets` quiets TensorFlow's native
start-up through :mod:`lookalike.models.backend` when it reads Keras's MNIST)."""
