from ssl_modules.cli import main

main()
