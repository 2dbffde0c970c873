resource "aws_security_group" "broken" {
  ingress {
    protocol    = "icmp"
    cidr_blocks = ["0.0.0.0/0"
  }
}
