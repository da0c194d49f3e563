module halfclose.local/pause

go 1.26
