"""This project's Invoke tasks: the devops_tasks collections, so `inv vm.boot`, `inv test`,
`inv shell`, `inv serve` and `inv vm.stop` work from this folder."""

from invoke import Collection

import devops_tasks

ns = Collection(devops_tasks.vm, devops_tasks.test, devops_tasks.shell, devops_tasks.serve)
