"""Workers reaching each other: introductions (introductions.py, with requester.py, target.py,
side.py, links.py, pending.py), the service relay, the peer policy's rules as the database holds
them and this process's one copy of them (rules.py), who may reach whom in the registry
(reach.py), the records of peer connections, peer events, and the STUN responder that tells a
worker its public UDP endpoint. A change to how peers find, reach or relay to each other starts
here.
"""
