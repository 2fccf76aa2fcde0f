"""Next-best message: which message to send a visitor next on a channel, when, and in which words.

settings (policy knobs), schemas (request bodies), templates (the message catalog of an item snapshot),
eligibility (trigger rules), timing (quiet hours, send time), history (caps and cooldowns), render (tone and
text), service (the decision), model (uplift model and its features), decision_log (the logged decision's
format), replay and train (offline learning from logged decisions), ope (offline policy evaluation),
repository (the only module here that reads or writes the store), endpoints (HTTP) and cli (commands).
"""
