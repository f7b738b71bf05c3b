"""What a job reads: listing folders, globs and prefixes, manifests, the shards a scan streams, and the input
kinds that expand a listed unit (archives) into Items.

May import: the top-level ``errors``, ``schema`` and ``storage`` modules only.
"""

from aidetect_batch.inputs import item, tars, zips

# The built-in kinds: a zip or tar named, found or listed is expanded (``--no-archives`` leaves them out).
item.register_built_in(zips.Zip())
item.register_built_in(tars.Tar())
