# Not loaded automatically (only terraform.tfvars and *.auto.tfvars are): name it on the
# command line, as with `terraform plan -var-file=admin.tfvars`.
admin_cidr = "0.0.0.0/0"
