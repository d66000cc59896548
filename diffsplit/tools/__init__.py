"""Developer and newcomer tools: ``diffsplit demo`` (:mod:`.demo`) and ``make-example-dataset``
(:mod:`.example_data`). Commands over the stages, not part of a training run."""
