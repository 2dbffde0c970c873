locals {
  anywhere_v6 = "::/0"
}

resource "aws_vpc" "main" {
  cidr_block = "10.0.0.0/16"
}

resource "aws_security_group" "app" {
  name   = "app"
  vpc_id = aws_vpc.main.id

  ingress {
    description = "resolved from the variable's default"
    protocol    = "icmp"
    from_port   = 8
    to_port     = -1
    cidr_blocks = [var.ping_cidr]
  }

  ingress {
    description = "unknown: var.admin_cidr has no default"
    protocol    = "icmp"
    from_port   = -1
    to_port     = -1
    cidr_blocks = [var.admin_cidr]
  }

  ingress {
    description = "trusted list from a default"
    protocol    = "icmp"
    from_port   = -1
    to_port     = -1
    cidr_blocks = var.trusted_cidrs
  }

  ingress {
    description      = "local value"
    protocol         = "icmpv6"
    from_port        = 128
    to_port          = -1
    ipv6_cidr_blocks = [local.anywhere_v6]
  }

  ingress {
    description = "conditional decided by a default"
    protocol    = "icmp"
    from_port   = -1
    to_port     = -1
    cidr_blocks = var.open_icmp ? ["0.0.0.0/0"] : ["172.16.0.0/12"]
  }

  ingress {
    description = "unknown: known only after apply"
    protocol    = "icmp"
    from_port   = -1
    to_port     = -1
    cidr_blocks = ["${aws_vpc.main.cidr_block}"]
  }

  dynamic "ingress" {
    for_each = var.icmp_rules
    content {
      protocol    = "icmp"
      from_port   = ingress.value.type
      to_port     = ingress.value.code
      cidr_blocks = [ingress.value.cidr]
    }
  }
}
