"""The data side of continued pretraining (`cptkit prepare`), one idea per module:

readers -> normalize -> filters -> tokenize (cached by shards) -> dedup -> split -> chunk -> mix ->
pack -> write, with the prepared folder's contract in `manifest`.
"""
