"""Next-best message: which message to send a visitor next on a channel, when, and in which words.

settings (policy knobs, channels), schemas (request bodies, the "none" answer), templates (the message catalog
of an item snapshot), eligibility (trigger rules, stock watch), timing (quiet hours, send time), history (caps
and cooldowns), render (tone and text), policy (send nothing or which message, with its propensity), service
(the decision), model (uplift model and its features), decision_log (the logged decision's format), replay
and train (learning from logged decisions), ope (offline policy evaluation), repository (the only module here
that reads or writes the store), endpoints (HTTP, served by the recommend app) and cli (commands).
"""
