# The three ways the AWS provider writes ingress rules.

resource "aws_security_group" "web" {
  name        = "web"
  description = "Public web servers"
  vpc_id      = "vpc-1234abcd"

  ingress {
    description = "HTTPS"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }

  ingress {
    description      = "all ICMP from anywhere"
    from_port        = -1
    to_port          = -1
    protocol         = "icmp"
    cidr_blocks      = ["10.0.0.0/8", "0.0.0.0/0"]
    ipv6_cidr_blocks = ["::/0"]
  }

  ingress {
    description      = "Path MTU Discovery"
    from_port        = 3
    to_port          = 4
    protocol         = "icmp"
    cidr_blocks      = ["0.0.0.0/0"]
  }

  ingress {
    description      = "packet too big"
    from_port        = 2
    to_port          = -1
    protocol         = "icmpv6"
    ipv6_cidr_blocks = ["::/0"]
  }

  ingress {
    description     = "monitoring"
    from_port       = -1
    to_port         = -1
    protocol        = "icmp"
    security_groups = [aws_security_group.monitoring.id]
    prefix_list_ids = ["pl-0123456789abcdef0"]
    self            = true
  }

  egress {
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_security_group" "monitoring" {
  name   = "monitoring"
  vpc_id = "vpc-1234abcd"
}

resource "aws_security_group_rule" "echo_from_anywhere" {
  type              = "ingress"
  security_group_id = aws_security_group.web.id
  protocol          = "icmp"
  from_port         = 8
  to_port           = -1
  cidr_blocks       = ["0.0.0.0/0"]
  description       = "ping"
}

resource "aws_security_group_rule" "icmp_out" {
  type              = "egress"
  security_group_id = aws_security_group.web.id
  protocol          = "icmp"
  from_port         = -1
  to_port           = -1
  cidr_blocks       = ["0.0.0.0/0"]
}

resource "aws_vpc_security_group_ingress_rule" "icmpv6_all" {
  security_group_id = aws_security_group.web.id
  ip_protocol       = "icmpv6"
  cidr_ipv6         = "::/0"
  description       = "icmpv6 without ports allows every type and code"
}

resource "aws_vpc_security_group_ingress_rule" "everything_v4" {
  security_group_id = aws_security_group.web.id
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_ingress_rule" "from_peer_group" {
  security_group_id            = aws_security_group.web.id
  ip_protocol                  = "icmp"
  from_port                    = -1
  to_port                      = -1
  referenced_security_group_id = aws_security_group.monitoring.id
}
