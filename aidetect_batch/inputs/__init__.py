"""What a job reads: listing folders, globs and prefixes, manifests, the shards a scan streams, and the input
kinds that expand a listed unit (archives, Parquet image datasets) into Items.

May import: the top-level ``errors``, ``schema`` and ``storage`` modules only.
"""

from aidetect_batch.inputs import item, parquets, tars, zips

# The built-in kinds: a zip, tar or Parquet file named, found or listed is expanded (``--no-archives`` leaves
# out the archives, not Parquet: a Parquet file scanned whole is never an image).
item.register_built_in(zips.Zip())
item.register_built_in(tars.Tar())
item.register_built_in(parquets.Parquet())
