variable "ping_cidr" {
  description = "who may ping; the default is what gets deployed unless overridden"
  type        = string
  default     = "0.0.0.0/0"
}

variable "admin_cidr" {
  description = "no default: given at plan time"
  type        = string
}

variable "trusted_cidrs" {
  type    = list(string)
  default = ["10.0.0.0/8"]
}

variable "icmp_rules" {
  description = "rules expanded by a dynamic block"
  type = list(object({
    type = number
    code = number
    cidr = string
  }))
  default = [
    { type = 3, code = 4, cidr = "0.0.0.0/0" },
    { type = 11, code = -1, cidr = "0.0.0.0/0" },
    { type = 8, code = -1, cidr = "192.168.0.0/16" },
  ]
}

variable "open_icmp" {
  type    = bool
  default = false
}
