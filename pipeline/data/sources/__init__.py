"""Raw datasets, read in source order: `load` finds a source's format and reads it into a
`raw.RawDataset` (`parquet_folder`, `cifar_archives`, `image_folder`); `lt_lists` reads the large
benchmarks' list files (ImageNet-LT, Places-LT, iNaturalist 2018)."""
