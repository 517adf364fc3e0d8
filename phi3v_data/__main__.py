from phi3v_data.cli import main

main()
