"""Building blocks several families share (flow-matching schedules, decoder-stack layer adapters, tiny
tokenizers). Not a family: nothing here is registered, and a family folder may import from it."""
