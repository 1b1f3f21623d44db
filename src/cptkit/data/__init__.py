"""The data side of continued pretraining (`cptkit prepare`), one idea per module:

readers -> normalize -> filters (document `steps`) -> tokenize (stored by `shards`, batches run by
`workers`) -> dedup, near_dedup, split (corpus `steps`) -> chunk -> mix -> pack -> write. `prepare`
chains them over a `plan` of the inputs; `manifest` is the prepared folder's contract and `prepared`
its typed reader; `cache` prunes the token store (`store/`).
"""
