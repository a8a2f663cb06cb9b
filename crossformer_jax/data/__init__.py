"""Host-side input: the config defaults (`config`), the sources (image folders, TFDS, ADE20K),
the per-task tf.data example functions, and the resumable, sharded iterators (`pipeline`)."""
