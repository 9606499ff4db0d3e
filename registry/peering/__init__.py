"""Workers reaching each other: introductions, the service relay, the peer policy's rules as
the database holds them, the records of peer connections, peer events, and the STUN responder
that tells a worker its public UDP endpoint. A change to how peers find, reach or relay to each
other starts here.
"""
