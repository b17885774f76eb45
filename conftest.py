# Real-server fixtures (nginx, redis-server, sshd) for every test module.
pytest_plugins = ["tests.servers"]
