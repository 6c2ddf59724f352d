"""The models of pgwarden's Django fault tests (app label ``faultapp``)."""
