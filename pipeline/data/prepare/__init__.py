"""Raw data -> Parquet shards + a sealed manifest: `from_raw` (decoded datasets, PNG shards),
`from_lists` with `source_shards` (the large benchmarks: the source files' own bytes), and
`publish` (the manifest written last, so a half-written dataset is never read)."""
