"""Streaming, resumable embedding jobs over large corpora (``fastclip embed INPUTS --out DIR``).

    from fastclip.jobs import embed_corpus
    summary = embed_corpus(model, ["shards/{00000..00099}.tar"], "out/", captions=True)

- ``open_inputs`` (sources.py): folders, image files, WebDataset tars, Parquet files and text files, local or
  through fsspec, as a deterministic list of Parts, each streaming its Samples;
- ``ShardWriter`` (writer.py): clip-retrieval's layout (``img_emb/``, ``text_emb/``, ``metadata/``) plus
  ``errors/``, each shard written under temporary names and renamed into place;
- ``embed_corpus`` (runner.py): one shard per part, resumable; ``embed_to_memory`` for small jobs.
"""
from .runner import JobSummary, embed_corpus, embed_to_memory
from .sources import Part, Sample, open_inputs
from .writer import ShardRows, ShardWriter

__all__ = ["JobSummary", "embed_corpus", "embed_to_memory", "Part", "Sample", "open_inputs", "ShardRows",
           "ShardWriter"]
